"""STARFlow2 (the Pretzel model): config, sequences, model, loss, training stages."""
