/**
 * Bandwidth limits: a token bucket per appliance and per protection group.
 *
 * The bucket may go into debt: a batch larger than the tokens at hand is sent
 * at once and the debt delays the next one. Over any long interval the bytes
 * sent are then rate × time + burst, whatever the batch sizes, which is what
 * keeps the shipped rate within a few percent of the limit over a minute.
 */
import type { Clock } from '../tap/tap.js';

/** Tokens a full bucket holds, as time at the rate: a short burst after an idle spell, no more. */
export const burstMsAtRate = 100;

export class TokenBucket {
  private bytesPerSecond: number;
  private tokens = 0;
  private refilledMs: number;

  /** `bytesPerSecond` 0 means unlimited. */
  constructor(private readonly clock: Clock, bytesPerSecond: number) {
    this.bytesPerSecond = TokenBucket.check(bytesPerSecond);
    this.refilledMs = clock.nowMs();
    this.tokens = this.capacityBytes();
  }

  private static check(bytesPerSecond: number): number {
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond < 0) throw new RangeError(`A rate limit must be 0 (unlimited) or a positive number of bytes per second, not ${bytesPerSecond}`);
    return bytesPerSecond;
  }

  get rateBytesPerSecond(): number {
    return this.bytesPerSecond;
  }

  /** Changes the rate from now on; tokens already earned are kept up to the new capacity. */
  setRate(bytesPerSecond: number): void {
    this.refill();
    this.bytesPerSecond = TokenBucket.check(bytesPerSecond);
    this.tokens = Math.min(this.tokens, this.capacityBytes());
  }

  private capacityBytes(): number {
    return (this.bytesPerSecond * burstMsAtRate) / 1000;
  }

  private refill(): void {
    const now = this.clock.nowMs();
    if (this.bytesPerSecond > 0 && now > this.refilledMs) {
      this.tokens = Math.min(this.capacityBytes(), this.tokens + ((now - this.refilledMs) * this.bytesPerSecond) / 1000);
    }
    this.refilledMs = now;
  }

  /** Milliseconds until a send may start (0: now). */
  delayMs(): number {
    if (this.bytesPerSecond === 0) return 0;
    this.refill();
    if (this.tokens >= 0) return 0;
    return Math.ceil((-this.tokens * 1000) / this.bytesPerSecond);
  }

  /** Records bytes sent (may leave the bucket in debt). */
  take(bytes: number): void {
    if (this.bytesPerSecond === 0) return;
    this.refill();
    this.tokens -= bytes;
  }
}
