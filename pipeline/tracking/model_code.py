"""The model file of a registered mask bank, for MLflow's models-from-code.

`register_bank` passes this file's path as `python_model`: MLflow copies it beside the model and,
when a version is loaded, runs it (after putting the model's own copy of `supsup` and `pipeline`
on sys.path) to get the model object, then calls its `load_context`, which loads and verifies the
bank. The model is thereby defined by source shipped with it, never by an unpickled object, so
replacing a file in the artifact store cannot run code through pickle at load time.

Not imported by the pipeline: running it sets MLflow's process-wide "current model", which is
what models-from-code asks of a model file and nothing a library module may do at import.
"""

import mlflow

from pipeline.tracking.pyfunc import SupSupModel

mlflow.models.set_model(SupSupModel())
