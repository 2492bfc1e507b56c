"""The over-refusal edit (issue 16 items 3, 4): SAE features of a circuit turned into a take-away intervention.

`intervene` holds the hook-based interventions (a projection exactly equivalent to the edited
weights, and the SAE-feature clamp), `weights` the orthogonalised checkpoint, `evaluate` the
side-by-side table, `stage` the pipeline stage.
"""
