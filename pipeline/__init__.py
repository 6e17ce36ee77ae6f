"""pope-pretrain's training library: config, position encodings, model, data loading, the training loop."""
