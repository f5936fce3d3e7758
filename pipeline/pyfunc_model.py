"""Where model versions registered before the layered layout find their pyfunc class.

MLflow pickles ``python_model`` by reference to its module; versions logged before the
``pipeline/registry/`` package existed name ``pipeline.pyfunc_model.RecommenderModel``.
"""

from pipeline.registry.pyfunc import BUNDLE_ARTIFACT, RecommenderModel

__all__ = ["BUNDLE_ARTIFACT", "RecommenderModel"]
