"""Value-guided training (``algorithm=guided``): a prefix scorer, guided decoding, distillation."""
