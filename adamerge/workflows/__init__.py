"""What the commands do, built on the run plan: export, predict, ablate, tune, demo."""
