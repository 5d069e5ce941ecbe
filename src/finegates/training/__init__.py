"""Training: one loop (loop, plan) that every objective (classify, lm, pretrain) and every method
(methods/) runs through; configs (config), the sparsity penalty and recipes (regularizer, recipes),
distillation (distill), several processes (distributed), checkpoints and run files (checkpoint)."""
