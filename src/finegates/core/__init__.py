"""The model-side core, torch only: the architecture table (arch), gates and the gated layer
(gates), applying them (model), which dimensions are coupled (coupling), compact attention
modules (compact), and the head's pooling (pooling)."""
