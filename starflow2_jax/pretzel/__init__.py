"""STARFlow2 (the Pretzel model): sequences, examples, toy tokenizer, config, model, loss, stages."""
