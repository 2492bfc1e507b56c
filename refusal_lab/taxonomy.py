"""The prompt labels and OR-Bench's categories, shared by the data loaders and the organism's corpus."""

LABELS: tuple[str, ...] = ("harmless", "safe", "toxic")
"""harmless: ordinary requests; safe: seemingly toxic but benign (OR-Bench hard/80k); toxic: truly harmful."""

OR_BENCH_CATEGORIES: tuple[str, ...] = (
    "deception",
    "harassment",
    "harmful",
    "hate",
    "illegal",
    "privacy",
    "self-harm",
    "sexual",
    "unethical",
    "violence",
)
