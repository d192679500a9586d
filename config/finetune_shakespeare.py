# Fine-tune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare in GPT-2 BPE (nanoGPT's recipe). The
# weights download on first use (about 6 GB, gpt/pretrained.py); with AdamW, weights, grads and
# optimizer state take 23 GiB of GPU memory, 27.6 with autocast's bf16 copies and the loss's
# buffers, before activations (python -m bench.mfu --gpu h100 --preset gpt2-xl plans it). A
# smaller start: --init_from=gpt2 (124M).

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-xl'

dataset = 'shakespeare'
init_from = 'gpt2-xl'
always_save_checkpoint = False  # keep the best val loss only

# 1 sequence * 1024 tokens * 32 accumulation = 32,768 tokens a step; the training split's 301,966
# tokens are about 9 steps an epoch
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a constant small learning rate
learning_rate = 3e-5
decay_lr = False
