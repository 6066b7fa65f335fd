//! The unauthenticated phase of node-to-node connections is bounded: at most
//! [`MAX_HANDSHAKES`] at once (more are closed at once), each with a deadline for the
//! whole handshake and first message, enforced by one watchdog thread that shuts the
//! socket down (a peer sending a byte now and then cannot keep it open).

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections in their handshake at once.
pub const MAX_HANDSHAKES: usize = 32;
/// Time for the handshake and the first message.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Pending {
    next: u64,
    by_id: HashMap<u64, (Instant, TcpStream)>,
}

pub struct HandshakeGate {
    pending: Arc<Mutex<Pending>>,
}

/// A connection in its handshake; dropping it ends the deadline and frees the slot.
pub struct HandshakeSlot {
    id: u64,
    pending: Arc<Mutex<Pending>>,
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HandshakeGate {
    pub fn start() -> std::io::Result<HandshakeGate> {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("mosix-deadline".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = Instant::now();
                let mut g = lock(&p);
                g.by_id.retain(|_, (deadline, s)| {
                    if *deadline <= now {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                        false
                    } else {
                        true
                    }
                });
            })?;
        Ok(HandshakeGate { pending })
    }

    /// A slot for `s`, or None when [`MAX_HANDSHAKES`] are under way (the caller drops
    /// the connection).
    pub fn admit(&self, s: &TcpStream) -> Option<HandshakeSlot> {
        let mut g = lock(&self.pending);
        if g.by_id.len() >= MAX_HANDSHAKES {
            return None;
        }
        let watch = s.try_clone().ok()?;
        let id = g.next;
        g.next += 1;
        g.by_id
            .insert(id, (Instant::now() + HANDSHAKE_DEADLINE, watch));
        Some(HandshakeSlot {
            id,
            pending: self.pending.clone(),
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        lock(&self.pending).by_id.remove(&self.id);
    }
}
