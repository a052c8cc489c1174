"""Download throughput of the Ray stage / img2dataset run alone (its multiprocessing distributor) on the
same URL list served over loopback, measured in the same run.

    python bench/bench_download.py            # full demo list (11,355 URLs)
"""
import argparse
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--processes", type=int, default=2)
    a = ap.parse_args()
    from cidistill.core.config import load_config
    from cidistill.app.demo_data import LoopbackServer, build_demo_data, write_urls
    from pipeline.download import DownloadStage
    from cidistill.core.runtime import init_ray, set_env_defaults

    set_env_defaults()
    data = build_demo_data(a.small)
    tmp = Path(tempfile.mkdtemp())
    with LoopbackServer(data.root) as srv:
        urls = write_urls(data, srv.base_url, tmp / "urls.parquet")
        cfg = load_config(None, [f"workdir={tmp / 'ray'}", f"data.urls={urls}", "data.allow_private_addresses=true"])
        init_ray(num_cpus=a.processes)
        t = time.perf_counter()
        st = DownloadStage(cfg).run()
        ray_s = time.perf_counter() - t
        import img2dataset

        d = cfg.data
        t = time.perf_counter()
        img2dataset.download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
                             output_format="webdataset", output_folder=str(tmp / "alone"), image_size=d.image_size,
                             resize_mode=d.resize_mode, encode_format=d.encode_format, encode_quality=9,
                             processes_count=a.processes, thread_count=d.thread_count,
                             number_sample_per_shard=d.samples_per_shard, extract_exif=False,
                             save_additional_columns=[c for c in d.extra_cols if c != "caption"],
                             disallowed_header_directives=list(d.disallowed_header_directives))
        alone_s = time.perf_counter() - t
    n = st["successes"]
    print(f"download {n} images: Ray stage {n / ray_s:.0f} img/s ({ray_s:.1f}s incl. planning), "
          f"img2dataset alone {n / alone_s:.0f} img/s ({alone_s:.1f}s) -> ratio {alone_s / ray_s:.2f}")


if __name__ == "__main__":
    main()
