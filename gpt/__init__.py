"""The GPT model, its data, optimizers and sampling."""
