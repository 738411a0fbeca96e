"""Config values that make each stage small enough for the test suite (seconds on 2 CPU cores). Test helpers,
not product code: the stages' own defaults are what users get."""

# a complete tiny world in about 10 s (data tiny, base model barely pretrained, no judge)
WORLD = dict(n_cold_start=40, n_rl_prompts=40, n_eval=20, n_general_sft=20, n_general_prompts=20,
             n_general_eval=10, n_preference=30, pretrain_steps=30, pretrain_corpus_lines=600,
             pretrain_batch_size=8, pretrain_seq_len=64, judge=False)

# cold start: 4 SFT steps on 32 examples
SFT = {"max_examples": 32,
       "trainer": {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_steps": 4,
                   "logging_steps": 1, "save_steps": 2, "max_length": 192}}

# reasoning RL: 2 GRPO steps of 2 prompts x 4 completions of <= 24 tokens
GRPO = {"max_prompts": 16,
        "trainer": {"learning_rate": 1e-4, "per_device_train_batch_size": 8, "num_generations": 4,
                    "max_completion_length": 24, "max_steps": 2, "logging_steps": 1, "save_steps": 1,
                    "beta": 0.0}}

# evaluation: 6 prompts, 2 samples each, short completions
EVAL = {"limit": 6, "k": 2, "max_new_tokens": 48}
