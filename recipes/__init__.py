"""One recipe per training objective (installed as `posttrain.recipes`). Each module has `main(cfg) -> metrics`."""
