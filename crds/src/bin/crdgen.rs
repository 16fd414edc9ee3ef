//! Prints the Dinoflow CRDs as YAML. With `--write DIR`, writes one file per CRD into DIR
//! (the checked-in `crds/*.yaml`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => print!("{}", dinoflow_api::crd::stream()),
        [flag, dir] if flag == "--write" => {
            for (name, yaml) in dinoflow_api::crd::all() {
                let path = PathBuf::from(dir).join(name);
                std::fs::write(&path, yaml)?;
                eprintln!("wrote {}", path.display());
            }
        }
        _ => {
            eprintln!("usage: crdgen [--write DIR]");
            std::process::exit(2);
        }
    }
    Ok(())
}
