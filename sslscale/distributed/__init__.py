"""Process-group set-up and autograd-aware collectives."""
