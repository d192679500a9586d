# The shakespeare-char baby GPT (nanoGPT's settings): a character-level model of tiny Shakespeare.
# A few minutes on one GPU; val loss about 1.47.

out_dir = 'out-shakespeare-char'
eval_interval = 250  # often, because this small model overfits
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # only when val improves

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

preset = 'shakespeare-char'  # 6 layers, 6 heads, 384 wide
dropout = 0.2  # a training setting: a preset leaves it alone

learning_rate = 1e-3  # a baby network can take a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little larger, since there are few tokens per step
warmup_iters = 100
