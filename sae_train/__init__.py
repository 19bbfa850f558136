"""sae_train: placeholder until its issue lands."""
