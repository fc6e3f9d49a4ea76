"""Readers and writers of the checkpoint formats Llama users hold: Meta, Hugging Face, llama2.c."""
