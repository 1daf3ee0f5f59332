//! Ranks as threads of one process: the same collectives as MPI's, through shared memory. Used by
//! the tests (a two-rank run inside `cargo test`, no MPI needed) and by anyone who wants to check
//! a multi-rank run's bits on one machine.
//!
//! A rank that fails calls [`Comm::abort`], which marks the group failed: every other rank's next
//! (or current) collective returns an error naming it instead of waiting. A rank that never comes
//! is reported after a timeout.

use super::bytes::{from_bytes, to_bytes};
use super::Comm;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a rank waits for the others at a collective before it gives up.
const WAIT: Duration = Duration::from_secs(300);

struct State {
    /// Rounds completed; each collective is one round.
    round: u64,
    /// Deposits of this round, by rank.
    slots: Vec<Option<Vec<u8>>>,
    /// The gathered deposits of this round, once all arrived, and how many ranks took them.
    result: Option<Arc<Vec<Vec<u8>>>>,
    taken: usize,
    /// Set when a rank aborted.
    failed: Option<usize>,
}

struct Shared {
    n: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of a group made by [`LocalGroup::ranks`].
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
    /// Bytes deposited for the other ranks ([`Comm::bytes_sent`]).
    sent: AtomicU64,
}

impl LocalGroup {
    /// `n` ranks that share one exchange: hand one to each thread.
    pub fn ranks(n: usize) -> Vec<Arc<dyn Comm>> {
        let shared = Arc::new(Shared {
            n,
            state: Mutex::new(State { round: 0, slots: vec![None; n], result: None, taken: 0, failed: None }),
            cv: Condvar::new(),
        });
        (0..n)
            .map(|rank| Arc::new(LocalGroup { rank, shared: shared.clone(), sent: AtomicU64::new(0) }) as Arc<dyn Comm>)
            .collect()
    }

    /// One round: deposit `x`, wait for every rank's, return them in rank order.
    fn exchange(&self, x: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let s = &self.shared;
        self.sent.fetch_add((x.len() * (s.n - 1)) as u64, Ordering::Relaxed);
        let start = Instant::now();
        let mut st = s.state.lock().map_err(|_| anyhow::anyhow!("rank group lock poisoned"))?;
        // The previous round may still be handing out its result.
        while st.result.is_some() {
            st = self.wait(st, start)?;
        }
        let round = st.round;
        st.slots[self.rank] = Some(x);
        if st.slots.iter().all(Option::is_some) {
            let all: Vec<Vec<u8>> = st.slots.iter_mut().map(|v| v.take().unwrap_or_default()).collect();
            st.result = Some(Arc::new(all));
            st.taken = 0;
            s.cv.notify_all();
        }
        while !(st.round == round && st.result.is_some()) {
            st = self.wait(st, start)?;
        }
        let out = st.result.clone().expect("checked above");
        st.taken += 1;
        if st.taken == s.n {
            st.result = None;
            st.round += 1;
            s.cv.notify_all();
        }
        Ok(out)
    }

    fn wait<'a>(
        &self,
        st: std::sync::MutexGuard<'a, State>,
        start: Instant,
    ) -> Result<std::sync::MutexGuard<'a, State>> {
        if let Some(r) = st.failed {
            bail!("rank {}: rank {r} failed, so the job stops", self.rank);
        }
        let left = WAIT.checked_sub(start.elapsed()).unwrap_or_default();
        if left.is_zero() {
            let missing: Vec<String> =
                st.slots.iter().enumerate().filter(|(_, v)| v.is_none()).map(|(r, _)| r.to_string()).collect();
            bail!("rank {}: waited {} s at a collective for rank(s) {}", self.rank, WAIT.as_secs(), missing.join(", "));
        }
        // The caller checks its condition again (and calls back here, which reports a failed
        // rank, only while it still has to wait).
        let (st, _) = self.shared.cv.wait_timeout(st, left).map_err(|_| anyhow::anyhow!("rank group lock poisoned"))?;
        Ok(st)
    }
}

impl Comm for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.n
    }
    fn kind(&self) -> &'static str {
        "threads"
    }
    fn all_gather_f32(&self, x: &[f32]) -> Result<Vec<f32>> {
        let all = self.exchange(to_bytes(x))?;
        Ok(all.iter().flat_map(|b| from_bytes::<f32>(b)).collect())
    }
    fn all_gather_f64(&self, x: &[f64]) -> Result<Vec<f64>> {
        let all = self.exchange(to_bytes(x))?;
        Ok(all.iter().flat_map(|b| from_bytes::<f64>(b)).collect())
    }
    fn all_gather_bytes(&self, x: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange(x.to_vec())?.as_ref().clone())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(Vec::new()).map(|_| ())
    }
    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Marks the group failed (the other ranks' collectives return errors) and ends this thread.
    fn abort(&self, code: i32) -> ! {
        if let Ok(mut st) = self.shared.state.lock() {
            st.failed.get_or_insert(self.rank);
        }
        self.shared.cv.notify_all();
        panic!("rank {} aborted the group (code {code})", self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_in_rank_order_over_many_rounds() {
        let comms = LocalGroup::ranks(3);
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    for round in 0..50 {
                        let got = c.all_gather_f32(&[r, round as f32]).unwrap();
                        assert_eq!(got, vec![0.0, round as f32, 1.0, round as f32, 2.0, round as f32]);
                        let b = c.all_gather_bytes(&vec![c.rank() as u8; c.rank()]).unwrap();
                        assert_eq!(b, vec![vec![], vec![1], vec![2, 2]]);
                    }
                    c.barrier().unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn all_to_all_and_varcount_gathers_deliver_each_part_to_its_rank() {
        let comms = LocalGroup::ranks(3);
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let me = c.rank() as u8;
                    // Rank r sends rank j the bytes [10 r + j] repeated j times.
                    let parts = (0..3u8).map(|j| vec![10 * me + j; j as usize]).collect();
                    let got = c.all_to_all_bytes(parts).unwrap();
                    let want: Vec<Vec<u8>> = (0..3u8).map(|r| vec![10 * r + me; me as usize]).collect();
                    assert_eq!(got, want, "rank {me}");
                    let (v, n) = c.all_gather_f32_varcount(&vec![me as f32; me as usize]).unwrap();
                    assert_eq!((v, n), (vec![1.0, 2.0, 2.0], vec![0, 1, 2]));
                    // The same as f32 in one buffer: rank r sends rank j the number 10 r + j, j times.
                    let send: Vec<f32> = (0..3u8).flat_map(|j| vec![(10 * me + j) as f32; j as usize]).collect();
                    let (got, lens) = c.all_to_all_f32(&send, &[0, 1, 2]).unwrap();
                    let want: Vec<f32> = (0..3u8).flat_map(|r| vec![(10 * r + me) as f32; me as usize]).collect();
                    assert_eq!((got, lens), (want, vec![me as usize; 3]), "rank {me}");
                    assert!(c.all_to_all_f32(&send, &[1, 1, 2]).is_err(), "blocks that do not cover the buffer");
                    // Pieces in place: rank r sends rank j (j != r) pieces of 1 and j + 1
                    // numbers, 100 r + 10 j + k for the k-th number.
                    let me = me as usize;
                    let mine: Vec<Vec<f32>> =
                        (0..3).map(|j| (0..j + 2).map(|k| (100 * me + 10 * j + k) as f32).collect()).collect();
                    let send: Vec<Vec<&[f32]>> =
                        (0..3).map(|j| if j == me { vec![] } else { vec![&mine[j][..1], &mine[j][1..]] }).collect();
                    let mut into: Vec<Vec<f32>> = (0..3).map(|_| vec![f32::NAN; me + 2]).collect();
                    let mut recv: Vec<Vec<&mut [f32]>> = into
                        .iter_mut()
                        .enumerate()
                        .map(|(r, v)| {
                            if r == me {
                                vec![]
                            } else {
                                let (a, b) = v.split_at_mut(1);
                                vec![a, b]
                            }
                        })
                        .collect();
                    c.exchange_f32(&send, &mut recv).unwrap();
                    for (r, v) in into.iter().enumerate().filter(|(r, _)| *r != me) {
                        let want: Vec<f32> = (0..me + 2).map(|k| (100 * r + 10 * me + k) as f32).collect();
                        assert_eq!(v, &want, "rank {me} from rank {r}");
                    }
                    // A piece to this rank itself is refused (by every rank), naming the rank.
                    let one = [1.0f32];
                    let mut bad: Vec<Vec<&[f32]>> = vec![vec![]; 3];
                    bad[me] = vec![&one[..]];
                    let mut none: Vec<Vec<&mut [f32]>> = (0..3).map(|_| vec![]).collect();
                    let err = c.exchange_f32(&bad, &mut none).unwrap_err().to_string();
                    assert!(err.contains(&format!("rank {me}")), "{err}");
                    assert!(c.bytes_sent() > 0);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_failed_rank_stops_the_others_with_its_name() {
        let mut comms = LocalGroup::ranks(2);
        let c1 = comms.pop().unwrap();
        let c0 = comms.pop().unwrap();
        let h = std::thread::spawn(move || c0.all_gather_f64(&[1.0]).unwrap_err().to_string());
        std::thread::sleep(Duration::from_millis(50));
        let _ = std::thread::spawn(move || c1.abort(1)).join();
        let msg = h.join().unwrap();
        assert!(msg.contains("rank 1 failed"), "{msg}");
    }
}
