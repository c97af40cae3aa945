"""Serving a registered mask bank: the input contract every server shares (`contract`), the one
function that answers rows (`answer`), the Ray Serve application (`app`), the `supsup serve`
command (`command`), and a bank split into task ranges held by Ray actors (`shards`).

Importing this package imports neither Ray nor MLflow: the MLflow model (pipeline.tracking.pyfunc)
uses `contract` and `answer` too.
"""
