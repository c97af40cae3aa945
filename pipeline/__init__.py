"""The system around `supsup`: configs, Ray jobs, the mask registry, MLflow tracking, the CLI.

Each heavy dependency has one owning module (pyarrow: registry, mlflow: tracking, ray: cluster and
the job modules); importing this package loads none of them.
"""
