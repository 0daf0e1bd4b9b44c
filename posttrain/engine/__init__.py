"""The training engine around the Hugging Face Trainer: trainer arguments (trainer_args.py), the speed plan
(plan.py), checkpoints and guards (checkpoints.py), run folders (run_dir.py), distributed helpers
(distributed.py), multi-process launch (launch.py), regional compilation (compile.py) and the model card."""
