"""The Hydra recipes: thin mains over personafuse.workflows (installed as personafuse.recipes)."""
