"""What `--dry_run` prints after the preflight: the data plan per bucket, the steps, where the run would write, the
optimizers and their schedules, validation, samples and the state it would resume from.
"""

from __future__ import annotations

from trainer.adapters.embedding_tokens import named_tokens
from trainer.config.schema import TrainConfig
from trainer.optim.plan import OptimizerPlan
from trainer.preflight.checks import Preflight


def optimizer_line(plan: OptimizerPlan, total_steps: int) -> str:
    """The optimizer plan in one line: each trained model's optimizer, rate and schedule."""
    def one(settings, schedule) -> str:
        warmup, decay = schedule.resolved(total_steps)
        # diffusers' constant schedule has no warmup (a warmup set with it is said to do nothing)
        shape = f"{schedule.name} (warmup {warmup}, decay over {decay} steps)" if schedule.name != "constant" \
            else "constant"
        return f"{settings.optimizer} lr {settings.lr:g}, {shape}"

    models = [("UNet", plan.unet, plan.unet_schedule)] if plan.train_unet else []
    if plan.train_text_encoder and plan.text_encoder_layers:
        models.append(("text encoder", plan.text_encoder, plan.text_encoder_schedule))
    if plan.embedding is not None:
        until = f" for the first {plan.embedding_steps} steps" if plan.embedding_steps else ""
        models.append(("embedding", plan.embedding, plan.text_encoder_schedule))
    else:
        until = ""
    kind = "one optimizer per model" if plan.separate and plan.train_unet else "one optimizer"
    return f"Dry run: {kind}: " + "; ".join(f"{who} {one(s, schedule)}" for who, s, schedule in models) + until + "."


def plan_lines(cfg: TrainConfig, preflight: Preflight, num_processes: int = 1) -> list[str]:
    """What `--dry_run` prints: the data plan and where the run would write."""
    from data.schedule import batches_per_bucket, epoch_items

    lines = preflight.scan.report()
    per_bucket = epoch_items(preflight.scan.items, cfg.seed, 0)
    batch = cfg.batch_size * num_processes
    batches = dict(sorted(batches_per_bucket(preflight.scan.items, batch).items()))  # batch_id groups apart
    samples = sum(len(rows) for rows in per_bucket.values())
    lines.append("Data: per epoch, images (with repeats) / batches per bucket: "
                 + ", ".join(f"{b} {len(per_bucket[b])}/{n}" for b, n in batches.items()))
    lines.append(
        f"Dry run: {samples} images per epoch in {sum(batches.values())} batches of {batch}, "
        f"{preflight.steps_per_epoch} steps/epoch (grad_accum {cfg.grad_accum}), {preflight.total_steps} steps in all "
        f"(max_epochs {cfg.max_epochs}, max_steps {cfg.max_steps or 'none'}), on {num_processes} process(es)."
    )
    lines.append(f"Dry run: the run folder would be {preflight.run_dir}, saves in {preflight.save_dir}"
                 + (f", the latent cache in {preflight.cache_dir}" if preflight.cache_dir else "") + ".")
    lines.append(optimizer_line(preflight.optimizer, preflight.total_steps))
    if preflight.embeddings:
        lines.append("Dry run: embeddings: " + ", ".join(
            f"'{t.token}' ({t.vectors} vector{'s' if t.vectors > 1 else ''} from '{t.initializer}', in "
            f"{sum(t.token in named_tokens(item.caption, preflight.embeddings) for item in preflight.scan.items)} "
            "captions)"
            for t in preflight.embeddings) + ".")
    plan = preflight.validation_plan
    if preflight.validation:
        sets = ", ".join(f"{name} {len(items)} images" for name, items in preflight.validation.items())
        first = plan.steps_in_epoch(1, preflight.steps_per_epoch)
        when = (f"after steps {', '.join(map(str, first))} of each epoch" if plan.every_n_epochs < 1 else
                f"at the end of every {plan.every_n_epochs:g} epoch(s)")
        lines.append(f"Dry run: validation sets: {sets}; measured {when}, and at the end.")
    if preflight.prompts:
        prompts = preflight.prompts
        requests = prompts.requests(cfg.batch_size)
        images = sum(len(r.cfgs) for r in requests)
        what = "random training caption(s)" if not prompts.samples else "sample prompt(s)"
        lines.append(f"Dry run: {len(requests)} {what} ({images} images with their cfgs) every "
                     f"{prompts.every(cfg.sample_steps)} steps and at the end, scheduler "
                     f"{prompts.scheduler or 'of the model'}.")
    if preflight.resume:
        lines.append(f"Dry run: would resume from {preflight.resume.state_dir} at step "
                     f"{preflight.resume.saved.global_step}.")
    return lines
