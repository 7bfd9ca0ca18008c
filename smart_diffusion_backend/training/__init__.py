"""Training the embedded default model `shapes-flux`: synthetic data, training loop, adherence analyser."""
