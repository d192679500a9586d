# GPT-2 124M on OpenWebText (nanoGPT's run): about 2.85 val loss after 300B tokens.
# Build the data first: python -m gpt.data openwebtext
# One node of 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

preset = 'gpt2'
bias = False  # nanoGPT's train.py default, which its run keeps (the preset has GPT-2's biases)
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

max_iters = 600000  # 300B tokens
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
