"""A run of one plan in a spawned process, on a teacher-logit store folder shared with others
(for the claims test of tests/test_logit_store.py)."""

from __future__ import annotations

from typing import Any


def run_on_shared_store(problem_json: dict, plan_json: dict, teacher_cache: str, store_root: str, threads: int,
                        barrier: Any, out: Any) -> None:
    import torch

    from smskd_search.data import load_data
    from smskd_search.engine import LogitStore, ensure_teacher, load_teacher, run_plan
    from smskd_search.plan import Plan, ProblemSpec

    torch.set_num_threads(threads)
    problem = ProblemSpec.model_validate(problem_json)
    data = load_data(problem.dataset, "cpu")
    record = ensure_teacher(problem, cache_root=teacher_cache, data=data)
    teacher = load_teacher(problem, record, data.info, "cpu")
    samples: list[int] = []
    teacher.register_forward_hook(lambda m, i, o: samples.append(i[0].shape[0]))
    store = LogitStore(store_root)
    barrier.wait()  # both reach the first epoch together
    result = run_plan(Plan.model_validate(plan_json), data=data, teacher_model=teacher, teacher_record=record,
                      logit_store=store)
    curve = [(m.cum_epochs, m.val_acc, m.val_loss, m.train_loss, m.train_kd, m.train_ref)
             for s in result.stages for m in s.epoch_metrics]
    out.put({"curve": curve, "teacher_samples": sum(samples), "served": store.served, "stored": store.stored,
             "waited": store.waited})
