"""A CatBoost ranking stage on top of the transformer score, trained on later periods."""
