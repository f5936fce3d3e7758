"""Layer 3, the recommenders: the shared base, ALS, item-kNN, candidate generation, the XGBoost
ranker, cold start, the two-stage model, and loading a saved bundle. Imports only the layers
below."""
