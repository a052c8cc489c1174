"""cidistill: image-text URL lists to a small bilingual CLIP student (CLIP-CID + DC-CLIP).

Layers (docs/ARCHITECTURE.md): `cidistill.app` (CLI, demo, compare, stage registry) on top; the curation stages
(`pipeline`), the training library (`kd`) and the data cards (`data_cards`) side by side; `cidistill.core`
(config, store, schemas, images, models, runtime, the stage driver) beneath them all."""
