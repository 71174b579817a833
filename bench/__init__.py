"""Benchmarks: adaption-fx against the base model and PEFT, side by side in one process."""
