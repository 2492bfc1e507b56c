"""The circuits stage: causal SAE-feature circuits for refusal, validated by ablation (issue 9)."""
