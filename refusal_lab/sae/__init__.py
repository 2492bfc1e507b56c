"""The sae stage: one sparse autoencoder per hook point of the activation store.

Modules: `config` (the `sae` config group's schema), `source` (store or in-memory activations),
`data` (held-out split, token filters, the seeded resumable shuffle stream), `model` (the SAE and
its sparse training kernels), `train` (optimizer, schedule, AuxK, checkpoints), `metrics`
(held-out FVU, L0, dead/dense fractions, bias, density histogram), `splice` (CE-loss recovered
and KL with the SAE spliced into the model), `saelens` (SAELens folder layout), `stage`
(`run_sae_stage`, called by the pipeline), `synthetic` (planted-dictionary data for tests and
benchmarks/bench_sae.py).

Architectures: TopK (default, with AuxK), ReLU + L1, and BatchTopK, which trains with the k x batch
largest activations of each batch and is saved as a JumpReLU SAE whose threshold keeps k latents
per token on average (BatchTopK rather than JumpReLU: no straight-through estimator bandwidth
to tune, and its L0 is set directly by k).

Load a trained SAE (a hook's folder under artifacts/sae/<fingerprint>/):

    from refusal_lab.sae.saelens import load_sae
    sae = load_sae(folder)                 # x_hat = sae(acts); sae.encode(acts) -> [..., d_sae]

    from sae_lens import SAE               # SAELens >= 6
    sae = SAE.load_from_disk(folder)

Kept free of imports: `refusal_lab.config` imports `refusal_lab.sae.config` while it loads.
"""
