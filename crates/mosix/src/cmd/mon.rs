//! `mosix mon` (also `mon`): the MOSIX monitor. A full-screen view of the cluster's nodes as
//! vertical bars, refreshed every second, with MOSIX mon's keys.

use anyhow::{bail, Result};
use mosix_proto::{ClusterStatus, NodeState, NodeStatus};
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The MOSIX monitor: the cluster's nodes as bars, updated every second.
///
/// Keys: l loads (runnable processes per unit of capacity, speed × CPUs), m memory
/// used/free, u utilisation, s relative CPU speeds, c CPUs per node, t number of active
/// nodes (toggle), h help, q quit; when the nodes do not fit the screen, ←/→ (or
/// PgUp/PgDn, Home/End) scroll.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mon                              # (= mosix mon) the cluster as this node sees it\n  \
    mon --interval-ms 250            # refresh four times a second\n  \
    mosix testbed exec 1 -- mosix mon")]
pub struct Args {
    /// Control socket of the mosixd to ask (default: as for `mosix status`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    interval_ms: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Load,
    Mem,
    Util,
    Speed,
    Cpus,
}

impl Mode {
    fn title(self) -> &'static str {
        match self {
            Mode::Load => "Load",
            Mode::Mem => "Memory (used/free)",
            Mode::Util => "Utilization",
            Mode::Speed => "Speed",
            Mode::Cpus => "CPUs",
        }
    }
}

struct View {
    mode: Mode,
    show_active: bool,
    help: bool,
    /// Index of the first node column shown.
    scroll: usize,
    /// Node columns that fit, from the last render (for paging).
    visible: usize,
    status: Option<ClusterStatus>,
    error: Option<String>,
}

pub fn run(a: Args) -> Result<i32> {
    let path = super::status::socket_path(a.socket)?;
    if !std::io::stdout().is_terminal() {
        bail!("mon needs a terminal; for scripts use `mosix status --json`");
    }
    let mut view = View {
        mode: Mode::Load,
        show_active: false,
        help: false,
        scroll: 0,
        visible: 1,
        status: None,
        error: None,
    };
    let interval = Duration::from_millis(a.interval_ms);
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> Result<()> {
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                match super::status::fetch(&path) {
                    Ok(s) => {
                        view.status = Some(s);
                        view.error = None;
                    }
                    Err(e) => view.error = Some(format!("{e:#}")),
                }
                next = Instant::now() + interval;
            }
            terminal.draw(|f| {
                let area = f.area();
                render(&mut view, area, f.buffer_mut());
            })?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    if k.kind != KeyEventKind::Release && key(&mut view, k.code, k.modifiers) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result.map(|_| 0)
}

/// Applies a key; true means quit.
fn key(v: &mut View, code: KeyCode, mods: KeyModifiers) -> bool {
    let n = v.status.as_ref().map_or(0, |s| s.nodes.len());
    let max_scroll = n.saturating_sub(v.visible);
    match code {
        KeyCode::Char('q') | KeyCode::Char('Q') => return true,
        KeyCode::Char('c') if mods.contains(KeyModifiers::CONTROL) => return true,
        KeyCode::Esc if !v.help => return true,
        KeyCode::Esc => v.help = false,
        KeyCode::Char('h') | KeyCode::Char('?') => v.help = !v.help,
        KeyCode::Char('l') => v.mode = Mode::Load,
        KeyCode::Char('m') => v.mode = Mode::Mem,
        KeyCode::Char('u') => v.mode = Mode::Util,
        KeyCode::Char('s') => v.mode = Mode::Speed,
        KeyCode::Char('c') => v.mode = Mode::Cpus,
        KeyCode::Char('t') => v.show_active = !v.show_active,
        KeyCode::Right => v.scroll = (v.scroll + 1).min(max_scroll),
        KeyCode::Left => v.scroll = v.scroll.saturating_sub(1),
        KeyCode::PageDown => v.scroll = (v.scroll + v.visible.max(1)).min(max_scroll),
        KeyCode::PageUp => v.scroll = v.scroll.saturating_sub(v.visible.max(1)),
        KeyCode::Home => v.scroll = 0,
        KeyCode::End => v.scroll = max_scroll,
        _ => {}
    }
    false
}

/// Writes `s` at (x, y), clipped to `area`; never panics.
fn put(buf: &mut Buffer, area: Rect, x: u16, y: u16, s: &str, style: Style) {
    if y < area.y || y >= area.bottom() || x < area.x || x >= area.right() {
        return;
    }
    let width = (area.right() - x) as usize;
    buf.set_stringn(x, y, s, width, style);
}

fn value(mode: Mode, n: &NodeStatus) -> Option<f64> {
    let l = n.load.as_ref()?;
    if n.state == NodeState::Down {
        return None;
    }
    Some(match mode {
        Mode::Load => l.load,
        Mode::Util => l.util,
        Mode::Speed => l.speed,
        Mode::Cpus => f64::from(l.cpus),
        Mode::Mem => l.mem_total.saturating_sub(l.mem_free) as f64,
    })
}

fn label(mode: Mode, n: &NodeStatus, width: usize) -> String {
    let Some(l) = n.load.as_ref().filter(|_| n.state != NodeState::Down) else {
        return "down".chars().take(width).collect();
    };
    let s = match mode {
        Mode::Load => format!("{:.2}", l.load),
        Mode::Util => format!("{:.0}%", l.util * 100.0),
        Mode::Speed => format!("{:.2}", l.speed),
        Mode::Cpus => l.cpus.to_string(),
        Mode::Mem => super::status::human(l.mem_free),
    };
    s.chars().take(width).collect()
}

const EIGHTHS: [&str; 9] = [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"];

fn render(v: &mut View, area: Rect, buf: &mut Buffer) {
    if area.width == 0 || area.height == 0 {
        return;
    }
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let (this, n_nodes, active) = match &v.status {
        Some(s) => (s.this_node.to_string(), s.nodes.len(), s.active_nodes()),
        None => ("?".into(), 0, 0),
    };
    let mut y = area.y;
    put(
        buf,
        area,
        area.x,
        y,
        &format!(
            "MOSIX mon - node {this} - {}   [l m u s c t h q]",
            v.mode.title()
        ),
        bold,
    );
    y += 1;
    if v.show_active {
        put(
            buf,
            area,
            area.x,
            y,
            &format!("Active nodes: {active} of {n_nodes}"),
            Style::default().fg(Color::Green),
        );
        y += 1;
    }
    if let Some(e) = &v.error {
        put(
            buf,
            area,
            area.x,
            y,
            &format!("mosixd: {e}"),
            Style::default().fg(Color::Red),
        );
        y += 1;
    }
    if v.help {
        render_help(area, buf, y);
        return;
    }
    let Some(st) = &v.status else {
        put(
            buf,
            area,
            area.x,
            y,
            "waiting for mosixd...",
            Style::default(),
        );
        return;
    };
    // Rows left: chart, value row, node row, scroll row.
    let bottom = area.bottom();
    if bottom < y + 4 {
        put(
            buf,
            area,
            area.x,
            y,
            "(terminal too small)",
            Style::default(),
        );
        return;
    }
    let n = st.nodes.len();
    let col = (area.width as usize)
        .checked_div(n)
        .map_or(4, |c| c.clamp(5, 8));
    let visible = ((area.width as usize) / col).max(1);
    v.visible = visible;
    v.scroll = v.scroll.min(n.saturating_sub(visible));
    let scrolling = n > visible;
    let scroll_row = if scrolling { 1 } else { 0 };
    let node_row = bottom - 1 - scroll_row;
    let value_row = node_row - 1;
    let chart_top = y;
    let chart_h = value_row.saturating_sub(chart_top) as usize;
    let max = match v.mode {
        Mode::Util => 1.0,
        Mode::Mem => st
            .nodes
            .iter()
            .filter_map(|n| n.load.as_ref().map(|l| l.mem_total as f64))
            .fold(1.0, f64::max),
        _ => st
            .nodes
            .iter()
            .filter_map(|n| value(v.mode, n))
            .fold(1.0, f64::max),
    };
    let bar_w = (col - 1).clamp(1, 6) as u16;
    for (i, node) in st.nodes.iter().skip(v.scroll).take(visible).enumerate() {
        let x = area.x + (i * col) as u16;
        let color = match node.state {
            NodeState::Up => Color::Cyan,
            NodeState::Incompatible => Color::Yellow,
            NodeState::Down => Color::DarkGray,
        };
        // For memory, the whole bar is the node's memory: used part solid, free part shaded.
        let (fill, total) = match (v.mode, value(v.mode, node), node.load.as_ref()) {
            (Mode::Mem, Some(used), Some(l)) => (used, Some(l.mem_total as f64)),
            (_, Some(val), _) => (val, None),
            _ => (0.0, None),
        };
        let eighths = if max > 0.0 {
            ((fill / max) * (chart_h * 8) as f64).round() as usize
        } else {
            0
        };
        let total_rows = total.map(|t| ((t / max) * chart_h as f64).round() as usize);
        for r in 0..chart_h {
            let yy = value_row - 1 - r as u16;
            let e = eighths.saturating_sub(r * 8).min(8);
            for dx in 0..bar_w {
                let Some(cell) = buf.cell_mut((x + dx, yy)) else {
                    continue;
                };
                if x + dx >= area.right() {
                    continue;
                }
                if e > 0 {
                    cell.set_symbol(EIGHTHS[e]).set_fg(color);
                } else if total_rows.is_some_and(|t| r < t) {
                    cell.set_symbol("░").set_fg(Color::Green);
                }
            }
        }
        put(
            buf,
            area,
            x,
            value_row,
            &label(v.mode, node, col - 1),
            Style::default(),
        );
        let mark = if node.this_node { "*" } else { "" };
        let status_style = if node.state == NodeState::Up {
            bold
        } else {
            Style::default().fg(color)
        };
        put(
            buf,
            area,
            x,
            node_row,
            &format!("{}{mark}", node.node),
            status_style,
        );
    }
    if scrolling {
        let last = (v.scroll + visible).min(n);
        put(
            buf,
            area,
            area.x,
            bottom - 1,
            &format!(
                "nodes {}-{} of {n}  (<-/-> scroll)",
                st.nodes[v.scroll].node,
                st.nodes[last - 1].node
            ),
            Style::default().add_modifier(Modifier::REVERSED),
        );
    }
}

fn render_help(area: Rect, buf: &mut Buffer, y: u16) {
    let lines = [
        "Help - MOSIX monitor keys",
        "  l   loads (runnable processes / (speed x CPUs))",
        "  m   memory: used (solid) / free (shaded)",
        "  u   utilization",
        "  s   relative CPU speeds (of one CPU)",
        "  c   number of CPUs",
        "  t   number of active nodes (toggle)",
        "  <- -> PgUp PgDn Home End   scroll",
        "  h   this help (h or Esc to close)",
        "  q   quit",
        "Nodes: * this node; grey = down; yellow = other protocol",
    ];
    for (i, l) in lines.iter().enumerate() {
        let style = if i == 0 {
            Style::default().add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        put(buf, area, area.x, y + i as u16, l, style);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mosix_proto::{GossipStats, LoadVector, PROTOCOL_VERSION};

    fn status(n: u32) -> ClusterStatus {
        ClusterStatus {
            this_node: 1,
            protocol: PROTOCOL_VERSION,
            uptime_s: 1.0,
            gossip: GossipStats::default(),
            nodes: (1..=n)
                .map(|i| NodeStatus {
                    node: i,
                    address: format!("10.0.0.{i}:5400"),
                    status: if i % 3 == 0 { 1 } else { 3 },
                    state: if i % 3 == 0 {
                        NodeState::Down
                    } else {
                        NodeState::Up
                    },
                    this_node: i == 1,
                    load: Some(LoadVector {
                        load: i as f64 / 2.0,
                        runnable: i as f64,
                        util: 0.5,
                        speed: 2.0,
                        cpus: i,
                        mem_total: 1 << 30,
                        mem_free: 1 << 29,
                        procs: 3,
                        proto: PROTOCOL_VERSION,
                        flags: 0,
                    }),
                    age_ms: Some(0),
                })
                .collect(),
        }
    }

    fn screen(buf: &Buffer) -> String {
        let a = buf.area;
        let mut s = String::new();
        for y in a.y..a.bottom() {
            for x in a.x..a.right() {
                s.push_str(buf.cell((x, y)).map_or(" ", |c| c.symbol()));
            }
            s.push('\n');
        }
        s
    }

    #[test]
    fn renders_at_every_size_without_panicking() {
        for n in [0, 1, 4, 40] {
            for (w, h) in [
                (0, 0),
                (1, 1),
                (5, 3),
                (20, 6),
                (80, 24),
                (200, 60),
                (13, 100),
            ] {
                for mode in [Mode::Load, Mode::Mem, Mode::Util, Mode::Speed, Mode::Cpus] {
                    for (help, active) in [(false, false), (true, true), (false, true)] {
                        let mut v = View {
                            mode,
                            show_active: active,
                            help,
                            scroll: 1000,
                            visible: 1,
                            status: Some(status(n)),
                            error: Some("x".into()),
                        };
                        let area = Rect::new(0, 0, w, h);
                        let mut buf = Buffer::empty(area);
                        render(&mut v, area, &mut buf);
                    }
                }
            }
        }
    }

    #[test]
    fn keys_switch_modes_and_scroll() {
        let mut v = View {
            mode: Mode::Load,
            show_active: false,
            help: false,
            scroll: 0,
            visible: 1,
            status: Some(status(40)),
            error: None,
        };
        let area = Rect::new(0, 0, 40, 12);
        let mut buf = Buffer::empty(area);
        render(&mut v, area, &mut buf);
        assert!(screen(&buf).contains("nodes 1-8 of 40"), "{}", screen(&buf));
        assert!(!key(&mut v, KeyCode::Right, KeyModifiers::NONE));
        let mut buf = Buffer::empty(area);
        render(&mut v, area, &mut buf);
        assert!(screen(&buf).contains("nodes 2-9 of 40"));
        key(&mut v, KeyCode::End, KeyModifiers::NONE);
        let mut buf = Buffer::empty(area);
        render(&mut v, area, &mut buf);
        assert!(screen(&buf).contains("nodes 33-40 of 40"));
        key(&mut v, KeyCode::Char('m'), KeyModifiers::NONE);
        assert_eq!(v.mode, Mode::Mem);
        key(&mut v, KeyCode::Char('t'), KeyModifiers::NONE);
        let mut buf = Buffer::empty(area);
        render(&mut v, area, &mut buf);
        assert!(screen(&buf).contains("Active nodes: 27 of 40"));
        // c: the CPUs of each node (node i has i CPUs here; nodes 33.. are shown).
        key(&mut v, KeyCode::Char('c'), KeyModifiers::NONE);
        assert_eq!(v.mode, Mode::Cpus);
        let mut buf = Buffer::empty(area);
        render(&mut v, area, &mut buf);
        assert!(screen(&buf).contains("CPUs"), "{}", screen(&buf));
        assert!(screen(&buf).contains("34"), "{}", screen(&buf));
        assert!(key(&mut v, KeyCode::Char('q'), KeyModifiers::NONE));
    }
}
