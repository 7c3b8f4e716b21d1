"""The whole MM1 model as a transformers folder: `mm1 export --hf` (see `export.py`).

`remote/` holds the three files an export ships (`configuration_mm1.py`, `modeling_mm1.py`,
`processing_mm1.py`): transformers' custom-model layout, loaded with `trust_remote_code=True` by
anyone who has transformers and not mm1. They never import mm1; mm1 imports them only in tests.
"""
