"""Source files that `pope export` ships into a Hugging Face folder (pipeline/hf_export.py), not imported from here.

`configuration_pope.py` and `modeling_pope.py` import `transformers` and, relatively, the copies of
pipeline/model.py and pipeline/positional.py that the export writes beside them (`pope_model.py`,
`pope_positional.py`); they only work inside an export folder.
"""
