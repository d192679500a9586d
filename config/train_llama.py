# A LLaMA-style model at GPT-2 small's size (RMSNorm, RoPE, SwiGLU, no biases, untied head) on
# OpenWebText, with GPT-2's recipe. Build the data first: python -m gpt.data openwebtext

wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'llama-124M'

preset = 'llama'
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000
lr_decay_iters = 600000
eval_interval = 1000
eval_iters = 200
log_interval = 10
weight_decay = 1e-1
