def test_open_clip_imports_in_driver():
    from cidistill.core.runtime import import_open_clip

    oc = import_open_clip()
    assert "ViT-B-32" in oc.list_models()


def test_open_clip_imports_in_ray_worker(ray_session):
    ray = ray_session

    @ray.remote
    def probe():
        import open_clip  # the worker_process_setup_hook applied the torchvision fix first

        return open_clip.__version__

    assert ray.get(probe.remote())
