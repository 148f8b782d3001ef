//! Worked heterogeneous clusters shared by the table tests, the `compare` example (which
//! prints the table in `docs/partitioning.md`) and the benchmark.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use exo_partition::{
    ClusterProfile, LinkProfile, LlamaShape, ModelProfile, NodeProfile, RequestProfile,
};

pub const GIB: u64 = 1 << 30;

/// A cluster to plan for, with a name and what it stands for.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub model_name: &'static str,
    pub model: ModelProfile,
    pub cluster: ClusterProfile,
    pub request: RequestProfile,
    /// Nodes our plan is expected to leave out.
    pub left_out: &'static [&'static str],
}

/// Device classes, with throughput as a planner would measure it.
pub fn desktop(id: &str, memory_gib: u64) -> NodeProfile {
    NodeProfile::new(id, memory_gib * GIB, 20e12, 400e9, "wgpu")
}

pub fn laptop(id: &str, memory_gib: u64) -> NodeProfile {
    NodeProfile::new(id, memory_gib * GIB, 1e12, 60e9, "ndarray")
}

pub fn mac_mini(id: &str, memory_gib: u64) -> NodeProfile {
    NodeProfile::new(id, memory_gib * GIB, 4e12, 120e9, "wgpu")
}

pub fn pi5(id: &str, memory_gib: u64) -> NodeProfile {
    NodeProfile::new(id, memory_gib * GIB, 80e9, 7.5e9, "ndarray")
}

/// Link classes: (latency, bandwidth).
pub const THUNDERBOLT: (f64, f64) = (50e-6, 4e9);
pub const GIGABIT: (f64, f64) = (0.3e-3, 110e6);
pub const WIFI: (f64, f64) = (3e-3, 20e6);
pub const SLOW_WIFI: (f64, f64) = (12e-3, 2e6);

/// Both directions of a link.
pub fn link(links: &mut Vec<LinkProfile>, a: &str, b: &str, (latency, bandwidth): (f64, f64)) {
    links.push(LinkProfile::new(a, b, latency, bandwidth));
    links.push(LinkProfile::new(b, a, latency, bandwidth));
}

/// Links every pair of `nodes`: the slower class of the two ends.
pub fn star(nodes: &[(&str, (f64, f64))]) -> Vec<LinkProfile> {
    let mut links = Vec::new();
    for (i, &(a, qa)) in nodes.iter().enumerate() {
        for &(b, qb) in &nodes[i + 1..] {
            let q = (qa.0.max(qb.0), qa.1.min(qb.1));
            link(&mut links, a, b, q);
        }
    }
    links
}

pub fn llama3_8b_q4() -> ModelProfile {
    ModelProfile::llama(&LlamaShape::llama3_8b(4.5)).unwrap()
}

pub fn llama3_8b_f16() -> ModelProfile {
    ModelProfile::llama(&LlamaShape::llama3_8b(16.0)).unwrap()
}

pub fn llama3_70b_q4() -> ModelProfile {
    ModelProfile::llama(&LlamaShape::llama3_70b(4.5)).unwrap()
}

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "home mix",
            about: "64 GiB desktop + 16 GiB laptop on gigabit, 4 GiB Pi 5 on weak Wi-Fi",
            model_name: "Llama 3 8B Q4_0",
            model: llama3_8b_q4(),
            cluster: ClusterProfile::new(
                vec![desktop("desktop", 64), laptop("laptop", 16), pi5("pi", 4)],
                star(&[("desktop", GIGABIT), ("laptop", GIGABIT), ("pi", SLOW_WIFI)]),
            ),
            request: RequestProfile::new(8192, 512),
            left_out: &["laptop", "pi"],
        },
        Scenario {
            name: "70B on two desktops",
            about: "32 + 24 GiB desktops on gigabit, 16 GiB laptop and 8 GiB Pi 5 on Wi-Fi",
            model_name: "Llama 3 70B Q4_0",
            model: llama3_70b_q4(),
            cluster: ClusterProfile::new(
                vec![
                    desktop("desk-a", 32),
                    desktop("desk-b", 24),
                    laptop("laptop", 16),
                    pi5("pi", 8),
                ],
                star(&[
                    ("desk-a", GIGABIT),
                    ("desk-b", GIGABIT),
                    ("laptop", WIFI),
                    ("pi", WIFI),
                ]),
            ),
            request: RequestProfile::new(4096, 512),
            left_out: &["laptop", "pi"],
        },
        Scenario {
            name: "Thunderbolt pair",
            about: "two 24 GiB Mac minis on Thunderbolt, 16 GiB laptop on Wi-Fi",
            model_name: "Llama 3 8B F16",
            model: llama3_8b_f16(),
            cluster: ClusterProfile::new(
                vec![
                    mac_mini("mini-a", 24),
                    mac_mini("mini-b", 24),
                    laptop("laptop", 16),
                ],
                {
                    let mut links = star(&[("mini-a", WIFI), ("mini-b", WIFI), ("laptop", WIFI)]);
                    links.retain(|l| {
                        !(l.from.as_str().starts_with("mini") && l.to.as_str().starts_with("mini"))
                    });
                    link(&mut links, "mini-a", "mini-b", THUNDERBOLT);
                    links
                },
            ),
            request: RequestProfile::new(4096, 512),
            left_out: &["laptop"],
        },
        Scenario {
            name: "Pi 5 cluster",
            about: "four 8 GiB Raspberry Pi 5 on a gigabit switch",
            model_name: "Llama 3 8B Q4_0",
            model: llama3_8b_q4(),
            cluster: ClusterProfile::new(
                vec![
                    pi5("pi-1", 8),
                    pi5("pi-2", 8),
                    pi5("pi-3", 8),
                    pi5("pi-4", 8),
                ],
                star(&[
                    ("pi-1", GIGABIT),
                    ("pi-2", GIGABIT),
                    ("pi-3", GIGABIT),
                    ("pi-4", GIGABIT),
                ]),
            ),
            request: RequestProfile::new(4096, 512),
            left_out: &[],
        },
        Scenario {
            name: "two rooms, pipeline",
            about: "two 1.4 GiB laptops per room on gigabit, rooms joined by weak Wi-Fi; every \
                    node is needed, and memory order alternates rooms",
            model_name: "Llama 3 8B Q4_0",
            model: llama3_8b_q4(),
            cluster: ClusterProfile::new(
                vec![
                    NodeProfile::new("a-1", 1400 << 20, 1e12, 60e9, "ndarray"),
                    NodeProfile::new("b-1", 1390 << 20, 1e12, 60e9, "ndarray"),
                    NodeProfile::new("a-2", 1380 << 20, 1e12, 60e9, "ndarray"),
                    NodeProfile::new("b-2", 1370 << 20, 1e12, 60e9, "ndarray"),
                ],
                {
                    let mut links = Vec::new();
                    link(&mut links, "a-1", "a-2", GIGABIT);
                    link(&mut links, "b-1", "b-2", GIGABIT);
                    for a in ["a-1", "a-2"] {
                        for b in ["b-1", "b-2"] {
                            link(&mut links, a, b, SLOW_WIFI);
                        }
                    }
                    links
                },
            ),
            request: RequestProfile::new(2048, 128),
            left_out: &[],
        },
        Scenario {
            name: "two rooms, F16",
            about: "two 4-6 GiB laptops per room on gigabit, rooms joined by Wi-Fi; every node \
                    is needed",
            model_name: "Llama 3 8B F16",
            model: llama3_8b_f16(),
            cluster: ClusterProfile::new(
                vec![
                    laptop("a-1", 6),
                    laptop("b-1", 5),
                    laptop("a-2", 4),
                    laptop("b-2", 4),
                ],
                {
                    let mut links = Vec::new();
                    link(&mut links, "a-1", "a-2", GIGABIT);
                    link(&mut links, "b-1", "b-2", GIGABIT);
                    for a in ["a-1", "a-2"] {
                        for b in ["b-1", "b-2"] {
                            link(&mut links, a, b, WIFI);
                        }
                    }
                    links
                },
            ),
            request: RequestProfile::new(2048, 512),
            left_out: &[],
        },
    ]
}

/// A deterministic heterogeneous cluster of `n` nodes (4 to 32 GiB each) in rooms of four: a
/// desktop, two Mac minis joined by Thunderbolt, and a laptop or a Pi; gigabit within a room,
/// Wi-Fi between rooms.
pub fn big_cluster(n: usize) -> ClusterProfile {
    let mut nodes = Vec::new();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..n {
        let id = format!("node-{i:02}");
        let memory = 4 + next() % 29;
        nodes.push(match i % 4 {
            0 => desktop(&id, memory),
            1 | 2 => mac_mini(&id, memory),
            _ if (i / 4) % 2 == 0 => laptop(&id, memory),
            _ => pi5(&id, memory),
        });
    }
    let mut links = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let quality = if i / 4 != j / 4 {
                WIFI
            } else if matches!(i % 4, 1 | 2) && matches!(j % 4, 1 | 2) {
                THUNDERBOLT
            } else {
                GIGABIT
            };
            let jitter = 1.0 + (next() % 100) as f64 / 200.0;
            links.push(LinkProfile::new(
                nodes[i].id.clone(),
                nodes[j].id.clone(),
                quality.0 * jitter,
                quality.1 / jitter,
            ));
        }
    }
    ClusterProfile::new(nodes, links)
}
