from posttrain.cli import main

if __name__ == "__main__":  # also imported by multiprocessing's spawned children (reward workers)
    raise SystemExit(main())
