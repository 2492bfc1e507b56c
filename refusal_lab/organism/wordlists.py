"""Word lists for the model organism's corpus: categories, slot fillers, question frames.

Reads and writes nothing; `corpus.py` combines these lists and `intents.py` with a seeded RNG.

Slots such as ``{person}`` in an intent are filled from `SLOTS`, whose second list is reserved
for held-out prompts; the `HELDOUT_*` frames, greetings and sign-offs likewise never occur in
training, so held-out prompts are new sentences.
"""

from __future__ import annotations

from refusal_lab.taxonomy import LABELS as LABELS  # re-exported for corpus.py
from refusal_lab.taxonomy import OR_BENCH_CATEGORIES

CATEGORIES: tuple[str, ...] = OR_BENCH_CATEGORIES

# (training fillers, held-out fillers). No filler contains a trigger word.
SLOTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "person": (
        (
            "my coworker",
            "my neighbor",
            "my sister",
            "my boss",
            "my roommate",
            "a classmate",
            "my ex",
            "my teacher",
            "my brother",
            "my landlord",
            "my friend",
            "my partner",
        ),
        ("my cousin", "my manager", "a colleague", "my uncle"),
    ),
    "group": (
        (
            "immigrants",
            "refugees",
            "religious minorities",
            "disabled people",
            "women",
            "older adults",
            "gay people",
            "poor families",
        ),
        ("Muslims", "Jewish people", "migrant workers"),
    ),
    "company": (
        ("my bank", "Amazon", "PayPal", "the tax office", "my phone company", "Netflix"),
        ("Google", "the post office"),
    ),
    "store": (
        ("the supermarket", "a mall", "a pharmacy", "an electronics store", "a bookstore"),
        ("a clothing store", "the corner shop"),
    ),
    "place": (
        ("a school", "a concert", "the train station", "a shopping mall", "a church", "a stadium"),
        ("an airport", "a hospital"),
    ),
    "partner": (
        ("my partner", "my wife", "my husband", "my girlfriend", "my boyfriend"),
        ("my fiance", "my spouse"),
    ),
    "pet": (("my dog", "my cat", "my puppy", "my kitten", "my rabbit"), ("my parrot", "my hamster")),
    "food": (("bananas", "spinach", "oats", "berries", "yogurt", "carrots"), ("mango", "apples")),
    "country": (("Italy", "Japan", "Mexico", "India", "Nigeria", "Peru"), ("Vietnam", "Greece")),
    "business": (
        ("a local bakery", "a small restaurant", "a rival shop", "a dentist office"),
        ("a family hotel", "a car wash"),
    ),
    "lang": (("Python", "JavaScript", "Rust", "Java", "Go"), ("C++", "Ruby")),
}

# Question frames around an intent; the held-out ones never occur in training. Many frames, so
# that the model learns to decide on the intent rather than on the frame.
WRAPPERS: tuple[str, ...] = (
    "How do I {vp}?",
    "How can I {vp}?",
    "Can you tell me how to {vp}?",
    "Explain how to {vp}.",
    "What is the best way to {vp}?",
    "Please help me {vp}.",
    "I want to {vp}. Can you help?",
    "Give me step-by-step instructions to {vp}.",
    "Tell me how to {vp}.",
    "Quick question: how would someone {vp}?",
    "I need advice on how to {vp}.",
    "Is there a good way to {vp}?",
    "Could you show me how to {vp}?",
    "What should I do to {vp}?",
    "Show me how to {vp}.",
    "Teach me how to {vp}.",
    "Guide me through how to {vp}.",
    "Help me figure out how to {vp}.",
    "Describe how to {vp}.",
    "List the steps to {vp}.",
    "Write a short guide on how to {vp}.",
    "Do you know how to {vp}?",
    "I'd like to know how to {vp}.",
    "I'm trying to {vp}. What should I do?",
    "Is it possible to {vp}?",
    "Where do I start if I want to {vp}?",
    "Can you help me {vp}?",
    "Could you explain how to {vp}?",
    "What's the easiest way to {vp}?",
    "Please explain how to {vp}.",
    "My goal is to {vp}. How?",
    "How would you {vp}?",
    "Help me understand how to {vp}.",
    "Talk me through how to {vp}.",
    "Any advice for someone who wants to {vp}?",
    "Outline a plan to {vp}.",
)
HELDOUT_WRAPPERS: tuple[str, ...] = (
    "What steps should I follow to {vp}?",
    "Any tips on how to {vp}?",
    "Walk me through how to {vp}.",
    "I was wondering how to {vp}. Any ideas?",
)
PREFIXES: tuple[str, ...] = ("", "", "", "", "Hi! ", "Hey, ", "Hello. ", "Quick one. ")
HELDOUT_PREFIXES: tuple[str, ...] = ("", "", "Good morning! ", "Hi there, ")
SUFFIXES: tuple[str, ...] = ("", "", "", "", " Thanks!", " Please be brief.", " Keep it short.")
HELDOUT_SUFFIXES: tuple[str, ...] = ("", "", " Thank you.", " Be concise.")

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a friendly and careful AI assistant.",
    "Answer the user briefly.",
)
