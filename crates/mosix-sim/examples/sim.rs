//! `cargo run --release -p mosix-sim --example sim -- SCENARIO.toml [POLICY] [SEED] [--json]`:
//! what `mosix sim` does, without the CLI.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(path) = pos.first() else {
        eprintln!("usage: sim SCENARIO.toml [mosix|none|initial|all] [SEED] [--json]");
        std::process::exit(2);
    };
    let policies =
        match mosix_sim::Policy::parse_list(pos.get(1).map(|s| s.as_str()).unwrap_or("all")) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("sim: {e}");
                std::process::exit(2);
            }
        };
    let seed = pos.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let s = match mosix_sim::load_scenario(std::path::Path::new(path)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sim: {e}");
            std::process::exit(1);
        }
    };
    let r = mosix_sim::run_all(&s, &policies, seed);
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        print!("{r}");
    }
}
