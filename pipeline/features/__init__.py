"""Layer 2, what models learn from: the interaction matrix with its id maps, feature tables
"as of" a time, popularity. Imports only the layers below."""
