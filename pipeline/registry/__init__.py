"""Layer 5, MLflow: model versions, aliases, and the pyfunc wrapper of a bundle. Imports only
the layers below."""
