"""RL with verifiable rewards: GRPO or RLOO (rl.algorithm) on TRL's GRPOTrainer / RLOOTrainer.

Each prompt is sampled rl.num_generations times; the completions are scored by rl.rewards (built-ins that check
the answer, the format or the length, math-verify, or your own function; posttrain/eval/rewards.py) and each is
pushed up or down by how it did against its group. A group whose completions all score the same teaches nothing,
so a task the model always or never solves gives zero loss: start from a model that sometimes gets it right.

- Full, LoRA (`adapter:`) or 1.58-bit ternary: rl.ternary swaps the decoder's linears for BitLinear (the ternary
  section's settings and lambda warm-up), a ternary starting model (a posttrain BitNet export) keeps its
  BitLinear layers; completions are then sampled from the ternary forward and the output is a BitNet folder (as
  recipe: ternary writes; `posttrain quantize OUT --format gguf-tq2` turns it into GGUF).
- The reference for the KL term (rl.beta > 0): with LoRA the same model with the adapter disabled (TRL's way; no
  second copy), in full fine-tuning a frozen copy TRL loads from the starting model's folder.
- Exact resume: one generation batch per optimizer step (TRL's steps_per_generation = gradient accumulation,
  num_iterations = 1), so a checkpoint never falls inside a batch of buffered completions, and the sampling RNG
  is in every checkpoint (the Trainer's RNG states): `--resume` after a kill reproduces the weights bit for bit.
- metrics.json: reward_history (the mean weighted reward of every optimizer step), the reward functions' last
  logged means, and the held-out rewards when there is eval data.
"""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from posttrain.data.prompts import prompt_examples
from posttrain.engine.plan import fixed_plan
from posttrain.engine.qat import convert_for_qat, lambda_after, save_ternary
from posttrain.errors import PosttrainError
from posttrain.eval.rewards import STEP_KEY, StepRewards, reward_functions
from posttrain.eval.sampling import sample_completions
from posttrain.integrations.transformers_warnings import no_is_gradient_checkpointing_warning
from posttrain.integrations.trl_rl import with_posttrain_sampling
from posttrain.models import is_adapter_dir, load_model
from posttrain.recipe import Data, Recipe, Setup, run_recipe
from posttrain.ternary.qat.bitlinear import bitlinear_layers


def rl_trainer(trainer_class):
    """TRL's RL trainer as the skeleton builds it: it batches raw rows (no data_collator argument, which the
    skeleton passes to every trainer), and its sampling reads a deprecated transformers name on every step
    (TRL's code, so the warning is silenced there: integrations/transformers_warnings.py)."""
    def __init__(self, *args, data_collator=None, **kwargs):
        trainer_class.__init__(self, *args, **kwargs)

    def training_step(self, *args, **kwargs):
        with no_is_gradient_checkpointing_warning():
            return trainer_class.training_step(self, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with no_is_gradient_checkpointing_warning():
            return trainer_class.evaluate(self, *args, **kwargs)

    return type(trainer_class.__name__, (trainer_class,),
                {"__init__": __init__, "training_step": training_step, "evaluate": evaluate})


TRAINERS = {"grpo": (rl_trainer(with_posttrain_sampling(GRPOTrainer, sample_completions)), GRPOConfig),
            "rloo": (rl_trainer(with_posttrain_sampling(RLOOTrainer, sample_completions)), RLOOConfig)}


class GRPO(Recipe):
    def __init__(self, cfg):
        self.trainer_class, self.args_class = TRAINERS[cfg.rl.algorithm]

    def examples(self, cfg, tokenizer) -> Data:
        # Prompt-only rows plus their answer columns (passed to the rewards); prompts too long to leave room for
        # a completion are dropped and counted.
        return Data(*prompt_examples(cfg, tokenizer))

    def setup(self, run) -> Setup:
        cfg = run.cfg
        if cfg.rl.beta > 0 and cfg.adapter is None and is_adapter_dir(run.model_path):
            raise PosttrainError(f"rl.beta > 0: TRL loads the reference from the base of the adapter "
                                 f"{cfg.model.name_or_path}, not the adapted model; merge it first (posttrain merge "
                                 f"{cfg.model.name_or_path} --out DIR) and start from DIR")
        # As configured (transformers picks sdpa by default): sampling pads the prompts, there is no packing. The KV
        # cache stays on (prepare_model, which turns it off for packed rows, is not called): sampling needs it.
        model = load_model(cfg.model, run.model_path, run.tokenizer, cfg.adapter)
        callbacks, ternary = self.ternary_setup(model, cfg)
        recorder = StepRewards()
        plan = fixed_plan(cfg.train)  # completions per micro-batch as configured; TRL samples them, nothing to pack
        return Setup(model=model, plan=plan, train_dataset=run.data.train, eval_dataset=run.data.eval,
                     callbacks=[recorder, *callbacks], speed=plan.as_dict(),
                     trainer_kwargs={"reward_funcs": reward_functions(cfg, recorder)}, args=self.rl_arguments(cfg),
                     state={"ternary": ternary})

    @staticmethod
    def ternary_setup(model, cfg) -> tuple[list, str | None]:
        """(callbacks, None | 'qat' | 'start'): rl.ternary converts a dense model (lambda warm-up as recipe: ternary);
        a ternary starting model already trains through its quantizer (lambda 1)."""
        if bitlinear_layers(model):
            if cfg.adapter is not None or cfg.rl.beta > 0:
                raise PosttrainError(f"{cfg.model.name_or_path} is a ternary model: train it without adapter and "
                                     "with rl.beta: 0 (the reference would not be the ternary model)")
            return [], "start"
        if cfg.rl.ternary:
            return [convert_for_qat(model, cfg)[1]], "qat"
        return [], None

    @staticmethod
    def rl_arguments(cfg) -> dict:
        """GRPOConfig / RLOOConfig's own arguments; engine/trainer_args.py maps everything the recipes share."""
        rl = cfg.rl
        args = dict(num_generations=rl.num_generations, max_completion_length=rl.max_completion_length,
                    temperature=rl.temperature, top_p=rl.top_p, beta=rl.beta, epsilon=rl.epsilon,
                    reward_weights=[spec.weight for spec in rl.rewards],
                    disable_dropout=True)  # the sampled and the trained log-probs come from the same network
        return {**args, "loss_type": rl.loss_type} if rl.algorithm == "grpo" else args

    def metrics(self, trainer, run, setup, final_eval) -> dict:
        log_history = trainer.state.log_history
        rewards = [(entry["step"], entry[STEP_KEY]) for entry in log_history if STEP_KEY in entry]
        last_train_log = next((entry for entry in reversed(log_history) if "reward" in entry), {})
        return {"reward_first": rewards[0][1] if rewards else None, "reward_last": rewards[-1][1] if rewards else None,
                "reward_history": rewards,
                "reward_functions_last": {k: v for k, v in last_train_log.items() if k.startswith("rewards/")},
                "kl_last": last_train_log.get("kl"), "reference": self.reference(run.cfg), "eval": final_eval,
                "ternary": setup.state["ternary"]}

    @staticmethod
    def reference(cfg) -> str:
        if cfg.rl.beta == 0:
            return "none (rl.beta: 0)"
        return "the model with the adapter disabled" if cfg.adapter else "a frozen copy of the starting model"

    def save(self, trainer, run, setup, folder, metrics) -> None:
        if setup.state["ternary"] is None:
            return super().save(trainer, run, setup, folder, metrics)
        quant_lambda = lambda_after(run.cfg, trainer.state.global_step) if setup.state["ternary"] == "qat" else 1.0
        save_ternary(trainer, run.cfg, run.model_path, run.tokenizer, folder, metrics, quant_lambda)

    def title(self, cfg) -> str:
        kind = "ternary" if cfg.rl.ternary else cfg.adapter.method if cfg.adapter else "full"
        names = ", ".join(spec.function.rpartition(":")[2] for spec in cfg.rl.rewards)
        return f"RL with verifiable rewards ({cfg.rl.algorithm.upper()}, {kind}, G={cfg.rl.num_generations}; {names})"


def main(cfg, resume: bool = False) -> dict:
    return run_recipe(GRPO(cfg), cfg, resume)
