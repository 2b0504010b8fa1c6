"""Adaptation and evaluation of exported encoders (linear probe first)."""
