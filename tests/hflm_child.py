"""Run by tests/test_harness.py in a fresh interpreter: lm-eval's own HFLM on a `pope export` folder (loaded by
transformers with trust_remote_code) and the project's `pope` class on the same folder, on the same requests and
on the same local multiple-choice task; writes both sets of numbers to a JSON file.

    python hflm_child.py EXPORT TASK.json OUT.json
"""

import json
import sys

# transformers imports torchvision whenever it is installed; the CPU set-up gets a torchvision built for another
# torch (tests/hf_child.py says more). Neither model needs it: hidden, transformers takes it for absent.
sys.modules["torchvision"] = None

from lm_eval import evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pipeline.harness import PopeLM  # noqa: E402

PAIRS = [("the music", " genome"), ("the music", " loss"), ("", "a query key"), ("a", " head value"),
         ("sample shard checkpoint resume preempt cluster node rank", " phase")]
TEXTS = ["the music genome position phase query key value head layer " * 3, "sample shard"]


def numbers(lm, task: dict) -> dict:
    pairs = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(PAIRS)]
    texts = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
             for i, t in enumerate(TEXTS)]
    out = evaluator.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False),
                                    bootstrap_iters=0)
    return {"loglikelihood": [list(r) for r in lm.loglikelihood(pairs)],
            "rolling": lm.loglikelihood_rolling(texts), "task": out["results"][task["task"]]}


def main(export: str, task_file: str, out_file: str) -> None:
    task = json.loads(open(task_file).read())
    hf = HFLM(pretrained=export, trust_remote_code=True, max_length=16, batch_size=2, device="cpu")
    pope = PopeLM(export, max_length=16, batch_size=2, device="cpu")
    result = {"hflm": numbers(hf, task), "pope": numbers(pope, task), "hf_class": type(hf.model).__name__}
    open(out_file, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
