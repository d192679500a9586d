import torch
from gpt.model import GPT, GPTConfig, model_ops
config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=50, norm="rmsnorm", pos_encoding="rope", mlp="swiglu", bias=False, tie_weights=False)
model = GPT(config, {op: "triton" for op in model_ops(config)})
idx = torch.randint(0, 50, (2, 16))
m = torch.compile(model, backend="inductor")
_, loss = m(idx, idx, return_logits=False)
loss.backward()
