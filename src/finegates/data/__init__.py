"""Data: atomic files (files), GLUE and own-data tasks (tasks), metrics, plain text for language
modelling (text), and tokenized classification examples (encoding)."""
