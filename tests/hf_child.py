"""Run by tests/test_hf_export.py in a fresh interpreter whose sys.path holds no part of this project: loads each
export folder given on the command line with transformers alone and writes what it computed to a JSON file.

    python hf_child.py SPEC.json OUT.json

SPEC: {"exports": {name: {"dir", "tokens", "prompt", "new", "too_long", "full"}}}. The project's packages are blocked
(an import of pipeline, data_prep or launch raises), so the export's own code has to carry the model.
"""

import json
import sys

for blocked in ("pipeline", "data_prep", "launch"):
    sys.modules[blocked] = None  # `import pipeline` now raises ImportError, even through an editable install
# transformers imports torchvision whenever it is installed; the CPU set-up gets torchvision from PyPI through
# mosaicml-streaming, built for another torch (its import fails: "operator torchvision::nms does not exist").
# The export needs no torchvision: hidden, transformers takes it for absent (find_spec returns None).
sys.modules["torchvision"] = None

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.dynamic_module_utils import check_imports, get_imports  # noqa: E402


def greedy(model, prompt, new, **kwargs):
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    return out[:, prompt.shape[1]:].tolist()


def main(spec_file: str, out_file: str) -> None:

    spec = json.loads(open(spec_file).read())
    results = {"version": transformers.__version__, "exports": {}}
    for name, item in spec["exports"].items():
        folder = item["dir"]
        files = [f"{folder}/{f}" for f in ("modeling_pope.py", "configuration_pope.py", "pope_model.py",
                                           "pope_positional.py")]
        for file in files:
            check_imports(file)  # raises ImportError for a module that is not installed
        imports = sorted({i for file in files for i in get_imports(file)})
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # fp32: config.json's torch_dtype
        model.eval()
        tokens = torch.tensor(item["tokens"])
        prompt = torch.tensor(item["prompt"])
        result = {"imports": imports, "class": type(model).__name__, "module": type(model).__module__,
                  "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                  "record": config.pope_pretrain, "parameters": sum(p.numel() for p in model.parameters())}
        with torch.no_grad():
            out = model(tokens, labels=tokens)
            result["logits"] = out.logits.tolist()
            result["loss"] = float(out.loss)
            if item["too_long"]:
                try:
                    model(torch.zeros(1, item["too_long"], dtype=torch.long))
                    result["too_long_error"] = None
                except ValueError as err:
                    result["too_long_error"] = str(err)
        result["cached"] = greedy(model, prompt[:1], item["new"], use_cache=True)
        result["uncached"] = greedy(model, prompt[:1], item["new"], use_cache=False)
        if item["full"]:  # the generation paths that do not depend on the encoding, on a few of them
            # a batch of two prompts of one length (no padding), and the dict output
            result["batch"] = greedy(model, prompt, item["new"], use_cache=True,
                                     attention_mask=torch.ones_like(prompt))
            dict_out = model.generate(prompt[:1], max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                      output_scores=True)
            result["dict_sequences"] = dict_out.sequences.tolist()
            result["beam_cached"] = greedy(model, prompt[:1], item["new"], num_beams=3, use_cache=True)
            result["beam_uncached"] = greedy(model, prompt[:1], item["new"], num_beams=3, use_cache=False)
            left_padded = torch.ones_like(prompt)
            left_padded[0, 0] = 0
            try:
                model.generate(prompt, attention_mask=left_padded, max_new_tokens=2, do_sample=False)
                result["left_padding_error"] = None
            except ValueError as err:
                result["left_padding_error"] = str(err)
        results["exports"][name] = result
    open(out_file, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
